// Drives the official novita-sdk (3.1.3) against a live server: submit an inpainting task, poll until it ends.
// Usage: node inpaint_flow.js <baseUrl> <apiKey> <modelName> <imageBase64File> <maskBase64File>
const { NovitaSDK, TaskStatus } = require("novita-sdk");
const fs = require("fs");

async function main() {
  const [baseUrl, key, model, imageFile, maskFile] = process.argv.slice(2);
  const sdk = new NovitaSDK(key);
  sdk.setBaseUrl(baseUrl);
  const submitted = await sdk.inpainting({
    extra: { response_image_type: "png" },
    request: {
      model_name: model, image_base64: fs.readFileSync(imageFile, "utf8"),
      mask_image_base64: fs.readFileSync(maskFile, "utf8"), prompt: "a red apple", image_num: 1, steps: 4, seed: 9,
      guidance_scale: 7, sampler_name: "DDIM", mask_blur: 4, inpainting_full_res: 0, inpainting_mask_invert: 0,
      initial_noise_multiplier: 1, strength: 0.9,
    },
  });
  let progress;
  for (let i = 0; i < 600; i++) {
    progress = await sdk.progress({ task_id: submitted.task_id });
    if (progress.task.status === TaskStatus.SUCCEED || progress.task.status === TaskStatus.FAILED) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  console.log(JSON.stringify({ task_id: submitted.task_id, progress }));
}

main().catch((e) => {
  console.error(JSON.stringify({ fatal: String(e), code: e.code, reason: e.reason, msg: e.msg }));
  process.exit(1);
});
